agorafs_add_test(device_test ${CMAKE_CURRENT_LIST_DIR}/device_test.cc)
