agorafs_add_test(debug_test ${CMAKE_CURRENT_LIST_DIR}/corrupt_test.cc)
