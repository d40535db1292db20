agorafs_add_test(fsck_test ${CMAKE_CURRENT_LIST_DIR}/fsck_test.cc)
